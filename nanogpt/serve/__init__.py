"""`nanogpt serve`: an OpenAI-compatible server over the batched decoding engine (nanogpt.generate).

main.py: the command (options, uvicorn, signals); app.py: the endpoints; protocol.py: OpenAI's request
and reply shapes; engine.py: the decoding thread (continuous batching); playground.html: the web page."""
