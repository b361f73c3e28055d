"""launch_server.py flags map onto EngineConfig and ServerArgs."""

from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.entrypoints.args import ServerArgs, parse_server_args


def test_every_flag_reaches_its_field(tmp_path):
    argv = ["--host", "0.0.0.0", "--port", "8001", "--served-model-name", "m", "--api-key", "k", "--log-level",
            "debug", "--model-path", str(tmp_path), "--tokenizer-path", str(tmp_path), "--dtype", "bfloat16",
            "--load-format", "dummy", "--max-model-len", "4096", "--seed", "3", "--sp-size", "4", "--tp-size", "2",
            "--ulysses-degree", "2", "--ulysses-layers", "linear", "--sp-min-tokens", "512", "--ring-mode", "allgather",
            "--lasp-mode", "allgather",
            "--disable-seq-parallel-tp", "--dist-init-addr", "tcp://10.0.0.1:5000", "--device", "cpu",
            "--attention-backend", "torch", "--max-running-requests", "8", "--max-waiting-requests", "16",
            "--chunked-prefill-size", "2048", "--page-size", "32", "--mem-fraction-static", "0.5",
            "--cpu-cache-gb", "2.5"]
    engine = EngineConfig(model_path=str(tmp_path), tokenizer_path=str(tmp_path), device="cpu", dtype="bfloat16",
                          load_format="dummy", sp_size=4, tp_size=2, ulysses_degree=2, ulysses_layers="linear",
                          sp_min_tokens=512,
                          max_model_len=4096, max_running_requests=8, max_waiting_requests=16,
                          chunked_prefill_size=2048, page_size=32, mem_fraction_static=0.5, cpu_cache_gb=2.5,
                          attention_backend="torch", ring_mode="allgather", lasp_mode="allgather",
                          seq_parallel_tp=False, seed=3, dist_init_addr="tcp://10.0.0.1:5000")
    assert parse_server_args(argv) == ServerArgs(engine, "0.0.0.0", 8001, "m", "k", "debug")


def test_defaults():
    args = parse_server_args([])
    assert args == ServerArgs(EngineConfig())
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 30000, "builtin")
    assert parse_server_args(["--model-path", "/m"]).served_model_name == "/m"


@pytest.mark.parametrize("argv, flag", [
    (["--port", "70000"], "--port"),
    (["--api-key", ""], "--api-key"),
    (["--cpu-cache-gb", "0"], "--cpu-cache-gb"),
    (["--tp-size", "0"], "--tp-size"),
    (["--sp-size", "2", "--ulysses-degree", "4"], "--ulysses-degree"),
    (["--tokenizer-path", "/no/such/dir"], "--tokenizer-path"),
    (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
    (["--chat-template", "{% for m in messages %}{{ m.content }}"], "--chat-template"),  # unclosed block
])
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse_server_args(argv).validate()


def test_chat_template_flag_takes_a_file_or_a_string(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        args = parse_server_args(["--chat-template", value])
        args.validate()
        assert args.chat_template == value
