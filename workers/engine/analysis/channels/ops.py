"""The op kinds the channel analysis models, by what they do to the channel dimension."""
from __future__ import annotations

# Ops whose output has the same channels, at the same place, as their first input.
CHANNEL_PRESERVING = {
    "aten::relu", "aten::relu_", "aten::relu6", "aten::relu6_", "aten::hardtanh", "aten::hardtanh_",
    "aten::sigmoid", "aten::sigmoid_", "aten::tanh", "aten::tanh_", "aten::hardswish", "aten::hardswish_",
    "aten::hardsigmoid", "aten::hardsigmoid_", "aten::gelu", "aten::gelu_", "aten::silu", "aten::silu_",
    "aten::elu", "aten::elu_", "aten::leaky_relu", "aten::leaky_relu_", "aten::mish", "aten::softplus",
    "aten::dropout", "aten::dropout_", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout",
    "aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
    "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
    "aten::adaptive_max_pool1d", "aten::adaptive_max_pool2d", "aten::adaptive_max_pool3d",
    "aten::contiguous", "aten::clone", "aten::detach", "aten::to", "aten::abs", "aten::neg", "aten::exp",
    "aten::square", "aten::pad", "aten::constant_pad_nd", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
    "aten::erf", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::reciprocal", "aten::sin", "aten::cos",
}
# Elementwise ops with two operands: two tensors tie their spaces; a scalar leaves the space alone.
ELEMENTWISE_BINARY = {
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
}
# Ops that only read a tensor's shape: they constrain nothing.
SHAPE_QUERIES = {"aten::size", "aten::dim", "aten::len", "prim::shape", "aten::numel", "prim::device", "prim::dtype",
                  "aten::__isnot__", "aten::__is__", "prim::is_cuda", "prim::Uninitialized", "prim::RaiseException",
                  "aten::format", "aten::warn"}
# Reshapes that keep the order of elements: the channel axis keeps, merges with the dims after it, or splits.
RESHAPES = {"aten::flatten", "aten::view", "aten::reshape", "aten::squeeze", "aten::unsqueeze", "aten::unflatten",
             "aten::squeeze_", "aten::unsqueeze_"}
REDUCTIONS = {"aten::mean", "aten::sum", "aten::amax", "aten::amin"}
CONVOLUTIONS = {"aten::conv1d": 1, "aten::conv2d": 2, "aten::conv3d": 3, "aten::conv_transpose1d": 1,
                 "aten::conv_transpose2d": 2, "aten::conv_transpose3d": 3, "aten::_convolution": 0,
                 "aten::convolution": 0}
# Products that are a linear layer when one operand is a parameter (``linear_forms``), else attention's.
LINEAR_PRODUCTS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"}
