"""`stylelora ui`: a local web UI over the same runs, configs and datasets the CLI uses.

`app.py` is the server (Starlette on uvicorn), `store.py` keeps runs and the queue in SQLite,
`runner.py` starts each run as `stylelora train` in its own process, `form.py` builds the config
form from the config models, `roots.py` keeps every path under the folders the UI was given,
`datasets.py` serves a dataset's images, captions and problems; the pages are static files in
`static/` that talk to the server's JSON API.
"""
