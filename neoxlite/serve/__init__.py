"""`neoxlite serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous batcher.

`requests` turns a JSON body into a checked generation request (or an ApiError with OpenAI's error shape),
`api` holds the endpoints, `cli` the command.
"""
