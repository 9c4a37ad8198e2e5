"""Eight fake CPU devices stand in for a TPU v3-8; XLA reads the flag at import."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

import jax  # noqa: E402  (after XLA_FLAGS, which jax reads at import)

from jaxseg import host_memory  # noqa: E402

# The commands the tests start run under the allocator a user's command puts in force,
# from their start: re-executing each would cost seconds of imports.
os.environ.update(host_memory.preload_environment())

# Identical programs compiled by several tests (or folds) are compiled once per session.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxseg-test-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

