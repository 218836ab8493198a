// The effkernels operator set, declared once. Backends only register implementations:
//   csrc/cpu/*.cpp    TORCH_LIBRARY_IMPL(effkernels, CPU, m)
//   csrc/cuda/*.cu    TORCH_LIBRARY_IMPL(effkernels, CUDA, m)
// Autograd (forward op -> *_backward op) and fake kernels are registered in Python
// (effkernels/_registration.py). The ops are functional: in training mode they return the batch
// mean and biased variance they normalised with, and the caller updates the running statistics.
// pwconv_bn_act's conv_out: y = conv1x1(x) in the statistics' dtype (fp32; fp64 for fp64 x),
// (N, Cout, H, W) channels_last, where the backend keeps it for the backward (the CPU kernels in
// training with keep_conv_out: the backward then runs two GEMMs rather than three), else an
// empty (0,) tensor; the backward recomputes y when it is None or empty. Callers that will not
// differentiate pass keep_conv_out=False (effkernels.ops does).
#include <torch/library.h>

TORCH_LIBRARY(effkernels, m) {
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int stride, int padding, int dilation, "
      "str act, bool training, float eps) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "dwconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor mean, Tensor var, int stride, int padding, int dilation, str act, "
      "bool training, float eps) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");

  m.def(
      "pwconv_bn_act(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, Tensor? residual, str act, bool training, "
      "float eps, bool keep_conv_out=True) -> (Tensor out, Tensor mean, Tensor var, "
      "Tensor conv_out)");
  m.def(
      "pwconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor mean, Tensor var, Tensor? residual, str act, bool training, "
      "float eps, Tensor? conv_out=None) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_residual)");

  m.def(
      "mixconv_bn_act(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int stride, int dilation, str act, "
      "bool training, float eps) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "mixconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor bn_weight, "
      "Tensor bn_bias, Tensor mean, Tensor var, int stride, int dilation, str act, "
      "bool training, float eps) -> (Tensor grad_x, Tensor[] grad_weights, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");

  // The inverted-residual block. Each stage is a list [weight, bn_weight, bn_bias,
  // running_mean, running_var]; `expand` is empty when the expansion ratio is 1 and `se` is
  // [reduce_weight, reduce_bias, expand_weight, expand_bias] or empty. `stats` holds (mean, var)
  // per BatchNorm, in block order. For now the block composes the ops above (see
  // csrc/inverted_residual.cpp); its fused kernels come with the GPU and fused-CPU backends.
  m.def(
      "inverted_residual(Tensor x, Tensor[] expand, Tensor[] depthwise, Tensor[] se, "
      "Tensor[] project, int stride, int dilation, str act, str se_act, str se_gate, bool skip, "
      "bool training, float eps) -> (Tensor out, Tensor[] stats)");

  // The same block in eval mode only (BatchNorm from the running statistics), for inference:
  // no statistics, no autograd (its gradient is refused). The CPU kernel
  // (csrc/cpu/inverted_residual.cpp) fuses the whole block; effkernels.ops.inverted_residual
  // calls it when not training and no gradient is needed. On the CPU (and in
  // inverted_residual_pack) a stage's weight may also come in parts, [parts..., bn_weight,
  // bn_bias, running_mean, running_var]: a split 1x1 conv's diagonal blocks, MixConv's
  // kernels (effkernels.nn's MixNet blocks).
  m.def(
      "inverted_residual_inference(Tensor x, Tensor[] expand, Tensor[] depthwise, Tensor[] se, "
      "Tensor[] project, int stride, int dilation, str act, str se_act, str se_gate, bool skip, "
      "float eps) -> Tensor");

  // The inference block with its weights packed once instead of on every call (CPU only):
  // inverted_residual_pack folds the BatchNorms, packs the GEMM panels for this CPU and x's
  // dtype and copies SE's weights into a uint8 tensor that describes the whole block (its
  // settings too; x only gives the dtype and is checked like the block's input);
  // inverted_residual_packed runs that block on x. Its int arguments are the block's, checked
  // against the buffer, and give the fake kernel the output's shape; the call passes no weight
  // lists (converting the ~20 tensors cost ~20 us per call). The packed tensor is a snapshot:
  // later changes to the weights are not seen (effkernels.nn.prepack_for_inference packs again
  // when they change in place).
  m.def(
      "inverted_residual_pack(Tensor x, Tensor[] expand, Tensor[] depthwise, Tensor[] se, "
      "Tensor[] project, int stride, int dilation, str act, str se_act, str se_gate, bool skip, "
      "float eps) -> Tensor");
  m.def(
      "inverted_residual_packed(Tensor x, Tensor packed, int out_channels, int kernel_size, "
      "int stride, int dilation) -> Tensor");

  // pwconv_bn_act in eval mode with its weights packed once (CPU only): pwconv_bn_act_pack
  // folds the BatchNorm from the running statistics and packs the weight's GEMM panels for this
  // CPU and x's dtype into a uint8 tensor (x only gives the dtype); pwconv_bn_act_packed runs
  // act(bn(conv1x1(x)) + residual) from it (out_channels: checked against the buffer, and the
  // fake kernel's output shape). A snapshot, as inverted_residual_pack's.
  m.def(
      "pwconv_bn_act_pack(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps) -> Tensor");
  m.def(
      "pwconv_bn_act_packed(Tensor x, Tensor packed, int out_channels, str act, "
      "Tensor? residual=None) -> Tensor");

  // y = act(x weight^T + bias) for the classifier heads at small batch, inference only (CPU,
  // fp32; csrc/cpu/linear_inference.cpp): F.linear's matrix-vector product at batch 1 runs on
  // one thread. A 4-D x (N, in_features, H, W) is averaged over H and W first (global
  // pooling). The models call it from their heads when no gradient is recorded.
  m.def("linear_inference(Tensor x, Tensor weight, Tensor? bias, "
        "str act=\"identity\") -> Tensor");

  // ACT(BN(conv2d(x, weight, bias, stride, padding, dilation))) for a dense (groups=1) k x k
  // convolution with few input channels, inference only (CPU, fp32;
  // csrc/cpu/conv_bn_act_inference.cpp): the models' stems, which oneDNN plus a separate
  // activation pass ran 1.1-1.6x slower (ad-hoc, bench/NOTES.md). The models call it from their
  // stems in inference when no gradient is recorded, eager or compiled.
  m.def(
      "conv_bn_act_inference(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, "
      "Tensor bn_bias, Tensor running_mean, Tensor running_var, int[2] stride, int[2] padding, "
      "int[2] dilation, float eps, str act) -> Tensor");

  // conv_bn_act_inference (the stem: x, stem_*; no dilation) followed by
  // inverted_residual_packed (packed .. dilation: a float32 block without an expand stage; not
  // both skip and SE), in one pass (CPU only;
  // csrc/cpu/inverted_residual.cpp): the stem's output rows are computed into the block's ring
  // and never stored. The models' prepacked batch-1 forwards call it for their first block.
  m.def(
      "stem_inverted_residual_packed(Tensor x, Tensor packed, int out_channels, "
      "int kernel_size, int stride, int dilation, Tensor stem_weight, Tensor? stem_bias, "
      "Tensor stem_bn_weight, Tensor stem_bn_bias, Tensor stem_running_mean, "
      "Tensor stem_running_var, int[2] stem_stride, int[2] stem_padding, float stem_eps, "
      "str stem_act) -> Tensor");
}
