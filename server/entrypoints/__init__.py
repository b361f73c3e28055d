"""The HTTP side (``launch_server.py``): ``args`` (flags), ``http_server`` (FastAPI app, uvicorn), ``serving``
(completions, chat, native generate), ``protocol`` (request bodies, error envelope), ``tokenizer_manager``
(tokenize, detokenize, talk to the engine), ``engine_process`` (the engine's loop behind zmq), ``metrics``."""
