// Host-side argument checks with messages that name the argument and the expectation.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "effkernels/activation.h"

namespace effkernels {

inline Act parse_act(const char* op, c10::string_view name) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::ReLU;
  if (name == "relu6") return Act::ReLU6;
  if (name == "hswish") return Act::HSwish;
  if (name == "silu") return Act::SiLU;
  if (name == "hsigmoid") return Act::HSigmoid;
  if (name == "sigmoid") return Act::Sigmoid;
  TORCH_CHECK_VALUE(false, op, ": act must be one of identity, relu, relu6, hswish, silu, "
                    "hsigmoid, sigmoid; got '", name, "'");
}

}  // namespace effkernels

#define EFFK_CHECK(OP, COND, ...) TORCH_CHECK(COND, OP, ": ", __VA_ARGS__)
