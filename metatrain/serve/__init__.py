"""Serving a trained model over the OpenAI API (`metatrain serve`): the batching engine,
the checks of OpenAI requests, and the HTTP app.

    engine.py     concurrent requests decoded together, one jitted step for all rows
    requests.py   OpenAI request bodies -> typed, checked requests; the error shape
    app.py        the Starlette routes and the service that answers them
    server.py     `serve_workdir`: a run's checkpoint loaded, then served by uvicorn
"""
