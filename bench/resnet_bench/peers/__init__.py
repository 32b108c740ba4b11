"""``make bench-peers``: the service against TorchServe and BentoML, same weights, same load,
same run.

TorchServe serves torchvision's ResNet18 with the very fp32 weights the service uses, through
its stock ``image_classifier`` handler (fp32 eager: TorchServe's own path), tuned to this
machine the way its performance guide says: one worker per usable CPU with one torch thread
each, batching on. BentoML serves them as its docs write an image classifier
(``peers.bentoml``). Each server runs alone under the project's closed-loop load generator;
the report gives the service's throughput and p99 at every concurrency as ratios to each
peer's. Each peer lives in a virtual environment of its own (made once, reused), so its pins
never touch the project's.

The modules, in the order a run uses them: ``options`` (what to run), ``venv`` (a peer's own
venv), ``archive`` and ``torchserve`` (TorchServe's model archive, configuration, server),
``bentoml`` (BentoML's service), ``service`` (the weights every server gets, and the service
itself), ``processes`` (process groups, readiness), ``load`` (the load and its figures),
``report`` (ratios, goals, ``peers.json``'s shape, Markdown) and ``run`` (the run and its
command line, ``python -m resnet_bench.peers``).
"""
