"""What an artifact's graph may call: the explicit allow-list of :mod:`qcompile.ir.serialize`.

A saved graph names its call targets as strings; loading turns each back into a callable, so the
set of strings that resolve is the set of things an artifact can make Python call. It is written
out here, not computed, so a reviewer can read it and a torch upgrade cannot widen it silently.

* **ATen** (:data:`ATEN_OPS`, ``name.overload``): the union of
  (1) the overloads torch 2.13 tags ``torch.Tag.core`` (core ATen, 189),
  (2) the overloads TVM 0.27's PyTorch importer converts (the table qcompile lowers through) and
  qcompile's own converters (``qcompile/codegen/tvm/converters.py``: ``to.device``, ``diff``,
  ``index_copy_``, ``clip``),
  (3) ``torch.export``'s bookkeeping (``sym_size``, ``sym_numel``, ``_assert_scalar``,
  ``_assert_tensor_metadata``, ``sym_constrain_range*``),
  minus the sparse-layout ops (``to_sparse``, ``_sparse_mm``, ``_sparse_addmm``: sparse tensors
  are not checked for out-of-range indices). None of them reads or writes files, takes a storage,
  or does anything but compute on tensors (the in-place ones write into tensors of the graph).
  ``tests/hostile/test_artifacts.py`` checks every name resolves and that the graphs of the
  tiny Llama and CNNs under every preset use nothing else.
* **qcompile** (:data:`QCOMPILE_OPS`): every op ``qcompile/ops`` registers (all pure: ``mutates_args=()``).
* **Python functions** (:data:`FUNCTIONS`): the symbolic-shape arithmetic ``torch.export`` emits
  (``operator``, ``math``, ``torch.sym_*``), by module and name. ``pow`` and the shifts are left
  out on purpose (with 64-bit operands they can take unbounded time or memory).
"""

from __future__ import annotations

from qcompile import ops

ATEN_OPS: frozenset[str] = frozenset(
    """
__and__.Scalar __and__.Tensor __or__.Scalar __or__.Tensor __xor__.Scalar __xor__.Tensor _adaptive_avg_pool2d.default
_adaptive_avg_pool2d_backward.default _adaptive_avg_pool3d.default _assert_async.default _assert_async.msg
_assert_scalar.default _assert_tensor_metadata.default _cdist_forward.default _embedding_bag.default
_fft_c2r.default _fft_r2c.default _local_scalar_dense.default _log_softmax.default _native_batch_norm_legit.default
_native_batch_norm_legit.no_stats _native_batch_norm_legit_functional.default
_native_batch_norm_legit_no_training.default _pdist_forward.default _softmax.default _to_copy.default
_upsample_bilinear2d_aa.default abs.default acos.default acosh.default adaptive_avg_pool1d.default
adaptive_avg_pool2d.default adaptive_avg_pool3d.default add.Scalar clip.default add.Tensor add_.Tensor addmm.default
affine_grid_generator.default alias.default amax.default amin.default any.default any.dim any.dims arange.default
arange.start arange.start_step argmax.default argmin.default argsort.default as_strided.default asin.default
asinh.default atan.default atan2.default atan2.out atanh.default avg_pool1d.default avg_pool2d.default
avg_pool2d_backward.default avg_pool3d.default baddbmm.default batch_norm.default bernoulli.p bitwise_and.Scalar
bitwise_and.Tensor bitwise_not.default bitwise_or.Scalar bitwise_or.Tensor bitwise_or_.Scalar bitwise_or_.Tensor
bitwise_xor.Scalar bitwise_xor.Tensor bmm.default broadcast_to.default bucketize.Tensor cat.default ceil.default
celu.default chunk.default clamp.Tensor clamp.default clamp_max.default clamp_min.default clone.default
col2im.default concat.default constant_pad_nd.default contiguous.default conv1d.default conv2d.default
conv3d.default conv_transpose1d.default conv_transpose2d.input convolution.default convolution_backward.default
copy.default copy_.default cos.default cosh.default cross_entropy_loss.default cumprod.default cumsum.default
detach.default detach_.default diagonal.default diff.default div.Scalar div.Scalar_mode div.Tensor div.Tensor_mode
dropout.default dropout_.default einsum.default elu.default embedding.default embedding_dense_backward.default
empty.memory_format empty_like.default empty_permuted.default empty_strided.default eq.Scalar eq.Tensor erf.default
exp.default expand.default expand_as.default expm1.default exponential.default eye.default eye.m fill.Scalar
fill_.Scalar flatten.using_ints flip.default floor.default floor_divide.default fmod.Scalar fmod.Tensor full.default
full_like.default gather.default ge.Scalar ge.Tensor gelu.default grid_sampler_2d.default group_norm.default
gru.input gt.Scalar gt.Tensor hamming_window.default hamming_window.periodic hamming_window.periodic_alpha
hamming_window.periodic_alpha_beta hardsigmoid.default hardswish.default hardswish_.default hardtanh.default
hardtanh_.default index.Tensor index_copy_.default index_put.default index_put_.default index_select.default
instance_norm.default isfinite.default isin.Tensor_Tensor isinf.default isnan.default item.default
layer_norm.default le.Scalar le.Tensor leaky_relu.default leaky_relu_.default lift_fresh_copy.default
linalg_vector_norm.default linear.default linspace.default log.default log10.default log1p.default log2.default
log_softmax.int logaddexp.default logical_and.default logical_not.default logical_or.default logical_xor.default
lstm.input lt.Scalar lt.Tensor masked_fill.Scalar masked_fill_.Scalar masked_scatter.default masked_select.default
matmul.default max.default max.dim max.other max_pool1d.default max_pool2d.default max_pool2d_with_indices.default
max_pool2d_with_indices_backward.default max_pool3d.default max_pool3d_with_indices.default maximum.default
mean.default mean.dim median.default median.dim meshgrid.default meshgrid.indexing min.default min.dim min.other
minimum.default mm.default mul.Scalar mul.Tensor mul_.Tensor narrow.default native_dropout.default
native_group_norm.default native_group_norm_backward.default native_layer_norm.default
native_layer_norm_backward.default ne.Scalar ne.Tensor neg.default new_ones.default new_zeros.default
nonzero.default one_hot.default ones.default ones_like.default outer.default pad.default permute.default
pixel_shuffle.default pow.Scalar pow.Tensor_Scalar pow.Tensor_Tensor prelu.default prod.default prod.dim_int
rand.default randn.default randn_like.default randperm.default reciprocal.default reflection_pad1d.default
reflection_pad2d.default reflection_pad3d.default relu.default relu6.default relu6_.default relu_.default
remainder.Scalar remainder.Tensor repeat.default replication_pad2d.default replication_pad3d.default reshape.default
reshape_as.default rnn_tanh.input roll.default round.decimals round.default rsqrt.default rsub.Scalar rsub.Tensor
scalar_tensor.default scaled_dot_product_attention.default scatter.src scatter.value scatter_add.default
scatter_reduce.two select.int select_scatter.default selu.default sigmoid.default sign.default silu.default
silu_.default sin.default sinh.default slice.Tensor slice_scatter.default softmax.int softplus.default
softshrink.default sort.default split.Tensor split_with_sizes.default sqrt.default square.default squeeze.default
squeeze.dim squeeze.dims stack.default std.correction sub.Scalar sub.Tensor sum.default sum.dim_IntList
sym_constrain_range.default sym_constrain_range_for_size.default sym_numel.default sym_size.int
sym_storage_offset.default sym_stride.int take.default tan.default tanh.default tile.default to.device to.dtype
to.dtype_layout topk.default transpose.int tril.default triu.default trunc.default type_as.default unbind.int
unflatten.int unsqueeze.default upsample_bicubic2d.vec upsample_bilinear2d.vec upsample_nearest2d.vec var.correction
var.dim view.default where.self zero_.default zeros.default zeros_like.default
""".split()
)

QCOMPILE_OPS: frozenset[str] = frozenset(f"{name}.default" for name in ops.QCOMPILE_OPS)

FUNCTIONS: frozenset[str] = frozenset(
    """
_operator.getitem _operator.add _operator.sub _operator.mul _operator.truediv _operator.floordiv _operator.mod
_operator.neg _operator.pos _operator.abs _operator.eq _operator.ne _operator.lt _operator.le _operator.gt
_operator.ge _operator.and_ _operator.or_ _operator.xor _operator.not_ _operator.invert
math.ceil math.floor math.trunc math.sqrt
torch.sym_max torch.sym_min torch.sym_not torch.sym_float torch.sym_int torch.sym_ite torch.sym_sum torch._sym_sqrt
""".split()
)
