"""``lwm serve``: any checkpoint of this project behind the OpenAI chat and completions API.

``server`` loads the checkpoint and runs the app (uvicorn; SIGTERM drains);
``http_app`` is the FastAPI app (auth, limits, streaming); ``openai_api`` the
API's request and response bodies; ``conversation`` lays chat messages (and one
image or video) out in LWM's chat template. Batching, the cache and the prefix
cache are the trainer's (``trainer.inference.engine``).
"""
