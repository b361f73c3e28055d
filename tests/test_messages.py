"""The messages between the HTTP process and the engine survive a pickle round trip (what zmq carries)."""

from __future__ import annotations

import pickle

from server.forward.plan import (
    ChunkPlan,
    MemoryStatsRequest,
    Placement,
    ProfileRequest,
    PromptScoring,
    Shutdown,
    StepPlan,
)
from server.messages import (
    AbortRequest,
    EngineStats,
    GenerateRequest,
    ProfileControl,
    ProfileReply,
    PromptTokenLogprob,
    RequestOutput,
    TokenLogprob,
)
from server.sampling_params import SamplingParams


def test_messages_round_trip():
    msgs = [
        GenerateRequest("r1", [1, 2, 3], SamplingParams(temperature=0.5, top_k=4, stop=["x"], seed=7, logprobs=2,
                                                        prompt_logprobs=1)),
        AbortRequest("r1"),
        RequestOutput("r1", [5], [TokenLogprob(5, -0.1, [(5, -0.1), (9, -2.5)])], True, "stop", 5, None, 3, 1, 0.25),
        RequestOutput("r2", [7], prompt_logprobs=[None, PromptTokenLogprob(3, -1.5, [(4, -0.5)], 2)]),
        EngineStats(1, 2, 3, 4, 5, 6),
        StepPlan([ChunkPlan(3, 10, 1, Placement.REPLICATED, 1, True, ((), (17,))),
                  ChunkPlan(4, 0, 8, Placement.SPLIT, 0, False, ((1,), (2,)), PromptScoring(3, 99))], [42], [(3, 5)],
                 [1, 2]),
        MemoryStatsRequest(reset=False),
        ProfileRequest(True, "/tmp/p", "profile-1", record_shapes=True),
        ProfileControl(False),
        ProfileReply(ranks=[{"rank": 0, "trace": "/tmp/p/x.trace.json.gz", "device_ms": 1.5}]),
        Shutdown(),
    ]
    for m in msgs:
        assert pickle.loads(pickle.dumps(m)) == m
