"""The recording gateway (`oel gateway`): OpenAI-compatible calls in, steps of episodes out (see gateway.app)."""
