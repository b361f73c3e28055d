"""Start the OpenAI-compatible server: ``python launch_server.py [--model-path DIR] [--sp-size P --tp-size T]``.

``python launch_server.py --help`` lists every flag; docs/server.md describes the API.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    # Imported here: the engine process is started with 'spawn', which re-imports this file in the child.
    from server.entrypoints.args import parse_server_args
    from server.entrypoints.http_server import run_server

    args = parse_server_args(argv)
    try:
        args.validate()
    except ValueError as e:
        print(f"launch_server.py: error: {e}", file=sys.stderr)
        return 2
    if args.engine.node_rank > 0:  # a worker node: its ranks join node 0's engine, no HTTP here
        from server.execution.worker import run_worker_node
        from server.models.builtin import builtin_model_path

        return run_worker_node(args.engine, args.engine.model_path or builtin_model_path(), args.log_level.upper())
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
