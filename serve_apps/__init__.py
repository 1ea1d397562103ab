"""Ray Serve applications: the world gateway, graph endpoints and the OpenAI-compatible LLM server."""
