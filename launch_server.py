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
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
