"""The HTTP side (``launch_server.py``): ``args`` (flags), ``http_server`` (FastAPI app, routes, uvicorn),
``serving`` (OpenAI completions and chat), ``responses`` (OpenAI Responses API), ``native`` (SGLang's
``/generate``), ``tokenize`` (vLLM's ``/tokenize`` / ``/detokenize``), ``streaming`` (waiting and SSE shared by
them), ``protocol`` (request bodies, validation, error envelope), ``tokenizer_manager`` (tokenize, detokenize,
talk to the engine), ``engine_process`` (the engine's loop behind zmq), ``metrics`` (Prometheus)."""
