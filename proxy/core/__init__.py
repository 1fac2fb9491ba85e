"""The core completion service: a typed request in, a stream of events out, whichever front it
came through. Owns model resolution, the prompt screen, the response cache, routing (local
engine or cloud), answer assembly with the output filter, token accounting and error mapping."""
