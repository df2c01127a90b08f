"""``--precision=mixed_bfloat16``: a model's convolutions and matmuls in bfloat16 through
TensorFlow's own (oneDNN) kernels, which use a CPU's AMX or AVX-512 BF16 units where it has
them, and every other layer in float32, each layer its own small XLA program.

Why not one XLA program, as float32 runs: XLA's CPU backend computes bfloat16 matmuls and
convolutions without that hardware (an AMX Xeon: 133 GFLOP/s for a 2048² bfloat16 matmul
under XLA, 640 through oneDNN), while TensorFlow's kernels outside XLA are slow at the
elementwise work XLA fuses (batch norm, ReLU, strided im2col slices). benchmarks/README.md
("Mixed precision") has the figures.

The policy is set by ``kernels_in(dtype)`` and read while a tf.function traces, as
``functional._MODE``:

* kernel ops (``matmul``, ``conv2d`` here; ``models.layers`` and ``models.keras_layers``
  call them for Dense and Conv2D) cast their floating inputs to the policy's dtype and
  return that dtype;
* ``fused(fn, *inputs)`` runs every other layer: compiled by XLA, floating inputs cast to
  float32 inside, floating outputs cast to the policy's dtype. Activations travel in
  bfloat16 between layers, as under Keras' ``mixed_bfloat16`` policy.

Weights, fast weights and their gradients stay float32: the casts are inside the
differentiated function, so each gradient is cast back to its weight's dtype. Derivatives of
every order are TensorFlow's registered ones (``Conv2D``'s are convolutions again, exactly)
and those of the fused functions; tests/mixed_precision_test.py checks the second-order
meta-gradient of this path in float64 against finite differences.
"""

from __future__ import annotations

import contextlib
import types

import tensorflow as tf

# --precision values that select this path, and the dtype of their kernels.
PRECISIONS = {"mixed_bfloat16": tf.bfloat16}

_POLICY = types.SimpleNamespace(dtype=None, fused_dtype=tf.float32)


def whole_step_xla(precision: str, jit_compile: bool) -> bool:
    """Whether a meta-step (or evaluation step) is compiled as one XLA program: as asked
    (``--jit_compile``), except under this path, whose kernels must stay outside XLA."""
    return jit_compile and precision not in PRECISIONS


@contextlib.contextmanager
def kernels_in(dtype, fused_dtype=tf.float32):
    """Within this context, traced kernel ops run in ``dtype`` and other layers ``fused`` in
    ``fused_dtype`` (float64 for both: the tests' exactness check of this path); ``dtype=None``
    turns the policy off (inside a fused layer, or a model run task by task)."""
    previous = (_POLICY.dtype, _POLICY.fused_dtype)
    _POLICY.dtype = None if dtype is None else tf.as_dtype(dtype)
    _POLICY.fused_dtype = tf.as_dtype(fused_dtype)
    try:
        yield
    finally:
        _POLICY.dtype, _POLICY.fused_dtype = previous


def kernel_dtype():
    """The policy's dtype, or None when it is off."""
    return _POLICY.dtype


def _cast(t, dtype):
    return tf.cast(t, dtype) if tf.is_tensor(t) and t.dtype.is_floating else t


def to_kernel_dtype(t):
    """A floating tensor in the policy's dtype (a kernel op's input)."""
    return _cast(t, _POLICY.dtype)


def matmul(a, b):
    """``tf.matmul(a, b)``, in the policy's dtype when it is on (the output too)."""
    dtype = _POLICY.dtype
    return tf.matmul(a, b) if dtype is None else tf.matmul(_cast(a, dtype), _cast(b, dtype))


def handles_conv(x, kernel, dilation, padding) -> bool:
    """Whether ``conv2d`` below runs this convolution: the policy is on, no dilation, TF's
    own padding, and one kernel for all tasks or one per task (a static count)."""
    return (_POLICY.dtype is not None and tuple(dilation) == (1, 1)
            and padding in ("same", "valid") and kernel.shape[0] is not None
            and (kernel.shape[0] == 1 or kernel.shape[0] == x.shape[0]))


def conv2d(x, kernel, strides, padding):
    """x ``[T, N, H, W, Cin]``, kernel ``[T or 1, kh, kw, Cin, Cout]`` -> ``[T, N, Ho, Wo,
    Cout]`` in the policy's dtype: ``tf.nn.conv2d`` once per task (once for all tasks with a
    shared kernel). Per task rather than one grouped convolution: measured 2x faster in
    bfloat16 on an AMX Xeon (16 tasks of 100 images, forward and gradients)."""
    dtype = _POLICY.dtype
    x, kernel = _cast(x, dtype), _cast(kernel, dtype)
    strides, padding = [1, strides[0], strides[1], 1], padding.upper()
    if kernel.shape[0] == 1:
        merged = tf.reshape(x, [-1] + x.shape[2:].as_list())
        out = tf.nn.conv2d(merged, kernel[0], strides, padding)
        return tf.reshape(out, [tf.shape(x)[0], tf.shape(x)[1]] + out.shape[1:].as_list())
    # unstack, not x[t]: the gradient of a slice is StridedSliceGrad, slow outside XLA.
    return tf.stack([tf.nn.conv2d(a, k, strides, padding)
                     for a, k in zip(tf.unstack(x), tf.unstack(kernel))])


def fused(fn, *inputs, xla: bool = True):
    """``fn(*inputs)`` in float32 as one XLA program (``xla=False``: TensorFlow's
    kernels, for a layer with Python side effects), its floating outputs cast to the policy's
    dtype. Tensors ``fn`` captures (the layer's weights) enter the program as they are."""
    dtype, fused_dtype = _POLICY.dtype, _POLICY.fused_dtype

    def run(*tensors):
        with kernels_in(None):
            out = fn(*[_cast(t, fused_dtype) for t in tensors])
        return tf.nest.map_structure(lambda y: _cast(y, dtype), out)

    if not xla:
        return run(*inputs)
    return tf.function(run, jit_compile=True, autograph=False)(*inputs)
