// attnkit: umbrella header. Includes every kernel family.
#pragma once

#include "analysis.hpp"
#include "core/error.hpp"
#include "core/options.hpp"
#include "core/positions.hpp"
#include "core/types.hpp"
#include "gau.hpp"
#include "linear.hpp"
#include "multi_head.hpp"
#include "reference.hpp"
#include "sdpa.hpp"
#include "sparse.hpp"
#include "synthesizer.hpp"
