"""TensorFlow for tf.data, imported without its start-up notices.

TensorFlow 2.21 writes its oneDNN and CUDA-driver notices to stderr from C++ before any
logging setting applies (TF_CPP_MIN_LOG_LEVEL no longer reaches them), twice per process,
in front of every command's own output. The import runs with file descriptor 2 pointed at
/dev/null. That hides everything written to stderr meanwhile: Python warnings raised by
the import too, and a native crash's message. An import that fails with a Python
exception still raises it, and its traceback prints after stderr is back.
"""
from __future__ import annotations

import os
import sys


def _import_quietly():
    # TensorFlow's C++ log lines after start-up (tf.data notices) honour this setting.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()  # what was written before goes out, not to /dev/null
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
        # The CUDA probe of a full (non -cpu) TensorFlow build runs at first device use.
        tensorflow.config.list_physical_devices()
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    return tensorflow


tf = _import_quietly()
