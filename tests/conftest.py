"""Eight fake CPU devices stand in for a TPU v3-8; XLA reads the flag at import."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

import jax  # noqa: E402  (after XLA_FLAGS, which jax reads at import)

# The commands the tests start keep glibc, tuned as on a CPU host without tcmalloc: each
# would otherwise re-execute itself under tcmalloc (seconds of imports), and one run of the
# suite with tcmalloc preloaded into every process it started took three times as long
# (cause not found). test_host_memory.py checks the tcmalloc path itself.
os.environ.setdefault("JAXSEG_ALLOCATOR", "glibc-tuned")

# Identical programs compiled by several tests (or folds) are compiled once per session.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxseg-test-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

