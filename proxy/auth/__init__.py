"""Who the caller is and what it may do: API keys (stored hashed) and JWT bearer tokens, each
giving a Grant (models, max_tokens, rate tier) that every front applies the same way."""
