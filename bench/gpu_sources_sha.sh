#!/usr/bin/env bash
# The sha256 of csrc/ (every file, in a fixed order): bench/gpu_prebuild.sh stores it beside the
# prebuilt extension, bench/gpu_check.sh uses that extension only while the sources match.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
