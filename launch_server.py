"""Start the OpenAI-compatible server: ``python launch_server.py [--model-path DIR or ORG/NAME] [--sp-size P]``.

``python launch_server.py --help`` lists every flag; docs/server.md describes the API.
"""

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    # Imported here: the engine process is started with 'spawn', which re-imports this file in the child. The flags
    # are checked before anything imports torch or the engine, so --help and a flag mistake answer at once.
    from server.entrypoints.args import parse_server_args

    args = parse_server_args(argv)
    try:
        args.validate_flags()
        args = args.with_local_model()  # a Hugging Face id becomes its snapshot directory (downloaded if needed)
        args.validate_model()
    except ValueError as e:
        print(f"launch_server.py: error: {e}", file=sys.stderr)
        return 2
    if args.engine.node_rank > 0:  # a worker node: its ranks join node 0's engine, no HTTP here
        from server.execution.worker import run_worker_node
        from server.models.builtin import builtin_model_path

        return run_worker_node(args.engine, args.engine.model_path or builtin_model_path(), args.log_level.upper())
    from server.entrypoints.http_server import run_server

    return run_server(args)


if __name__ == "__main__":
    code = main()
    # Everything is stopped in order by now (engine joined, sockets closed): skip the interpreter's teardown of the
    # modules, which takes seconds with torch loaded and would only delay the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
