"""Torch-free serving code used by service.py; no module here imports service.py or train_export.

A request, by file: asgi.py (types), request_log.py and admission.py (middlewares: one log line,
then key, type, size, concurrency, the gate and timeout; errors.py is every refusal) ->
fast_lane.py (a request alone in its worker skips BentoML's endpoint and batcher) -> uploads.py
(the multipart body, files only) -> inputs.py (each endpoint's input types: routed by
routing.py, decoded by preprocess.py) -> BentoML's batcher (batcher.py) -> predictor.py
(runtime.py per variant, drift.py's window, the task's post-processing in classification.py, a
copy to shadow.py) -> schemas.py (JSON).

Built once at start: settings.py (configuration.yaml, one typed model per service),
deployment.py (the store entries it serves, checked against contract.py, the card), metrics.py
(the Prometheus series), middleware.py (the middlewares every service gets), openapi.py (the
Swagger UI's description).
"""
