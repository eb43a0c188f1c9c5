"""Ray Serve for a nanoray family: chat, an OpenAI-compatible API, CORE and a web page for every depth.

    python -m serve --run-dir runs/miniseries      # then open http://127.0.0.1:8000/

serve/app.py launches (ServeArgs, the builder, serve_family); serve/routes.py is the HTTP edge (the FastAPI
app and its Gateway ingress); serve/text.py the ingress's tokenizer work (prompts in, checked; tokens out, as
text); serve/openai.py OpenAI's response shapes; serve/errors.py the error bodies; serve/schemas.py every
shape, including the typed contract between the ingress and serve/depth.py, the per-depth deployment around
the inference engine; serve/family.py finds the checkpoints; serve/static/index.html is the page and
serve/config.yaml the Serve config for `serve run` and `serve deploy`.
"""
