"""The OpenAI-compatible persona server: per-request steering, readings and guards, metrics and a dashboard.

- `guards`: the rules (`TRAIT>X:flag`, `TRAIT>X:steer=C`, `TRAIT:cap=X`);
- `service`: batching and the model side (readings from the forward passes that generate the answer);
- `app`: the HTTP API (FastAPI), `/metrics` (Prometheus), `/health`, and the dashboard at `/`.
"""
