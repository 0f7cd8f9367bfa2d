"""poegen on Ray Serve: each expert a Serve deployment behind Serve's gRPC proxy.

``app`` holds the deployment and :func:`~poegen.ray_serve.app.build_app` (the ``import_path``
of ``deploy/ray/config.yaml``); ``README.md`` beside it says how to run it. Needs the ``ray``
extra (``pip install 'poegen[ray]'``).
"""
