"""Ray Serve for a nanoray family: chat, an OpenAI-compatible API, CORE and a web page for every depth.

    python -m serve --run-dir runs/miniseries      # then open http://127.0.0.1:8000/

serve/app.py holds the ingress (routes, OpenAI shapes, errors) and the builder, serve/depth.py the
per-depth deployment around the inference engine, serve/schemas.py the request and response shapes,
serve/family.py finds the checkpoints, serve/static/index.html is the page, serve/config.yaml the
Serve config for `serve run` and `serve deploy`.
"""
