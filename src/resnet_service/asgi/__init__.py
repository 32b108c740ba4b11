"""HTTP plumbing below the HTTP faces: request context and admission middleware, body reading,
route dependencies, and errors as HTTP (the status table and the problem+json builder)."""
