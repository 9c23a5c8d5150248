"""The GPU floor: what the CUDA renderer, the mesh tracer and the scatter Monte Carlo stand on.

* :mod:`drrfarm.gpu.device` -- one GPU through pycuda: its primary context, kernel modules, streams,
  events, page-locked host buffers and parameter staging;
* :mod:`drrfarm.gpu.build` -- kernel building and the caches (disk, prebuilt fat binaries), keyed on
  every source and header a kernel includes;
* :mod:`drrfarm.gpu.layouts` -- the kernels' parameter records as NumPy dtypes, beside the C structs
  of ``kernels/params.cuh``; ``kernels/shared.cuh`` holds what the kernels share (Philox4x32-10, the
  thread's pixel);
* :mod:`drrfarm.gpu.textures` -- layered CUDA arrays and texture objects (driver calls pycuda lacks);
* :mod:`drrfarm.gpu.resident_cache` -- an LRU of GPU-resident entries bounded by bytes.

Only :mod:`drrfarm.gpu.device` imports pycuda; the others run on any machine. Nothing here imports
the renderers or the scatter code.
"""
