"""A local web page and a REST API over the one inference path.

:func:`crystalscope.serve.app.create_app` builds the FastAPI application around a loaded
:class:`~crystalscope.inference.predictor.Predictor` (tests use it without a server);
:func:`crystalscope.serve.server.serve` checks the bind address and runs it with uvicorn.
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, ONNX Runtime; no torch).
"""
