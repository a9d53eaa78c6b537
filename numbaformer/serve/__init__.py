"""`numbaformer serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched
engine. protocol.py: request models and the error envelope; openai.py: responses and SSE chunks;
bridge.py: the engine thread; metrics.py: Prometheus metrics; app.py: the routes."""
