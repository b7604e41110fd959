"""Test helpers, one module per concern (imported as ``helpers.<module>``; pytest puts
``tests/`` on ``sys.path``, and scripts run from ``tests/`` have it there too):

* :mod:`helpers.models`: the one tiny random-weight causal LM builder (with presets);
* :mod:`helpers.saes`: SAEs for the feature-finding tests (random serving SAEs come from
  :func:`sae_steer_vllm.sae.random_sae`, the product's own builder);
* :mod:`helpers.corpora`: JSONL corpora and documents that hit edge cases;
* :mod:`helpers.activations`: synthetic activations and activation caches;
* :mod:`helpers.steering`: a plain-transformers reference for steered prompt logprobs;
* :mod:`helpers.fake_endpoint`: a scriptable fake OpenAI endpoint for the eval tests.
* :mod:`helpers.admission`: a small SAE catalog and the admission call (unit + fuzz tests).
* :mod:`helpers.registry`: the runtime-SAE registry without an engine (a config, worker
  states as TP ranks, a fake engine's collective RPC) and ``/v1/saes`` calls on a server.

Server processes are started with :mod:`benchmarks.server_process`, the product's one helper.
"""
