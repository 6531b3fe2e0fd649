"""How the audit cuts its images into worker tasks (run by :func:`crystalscope.runtime.run_chunks`).

Used by the fingerprinting pass (:mod:`.scan`) and by the second decode that verifies
duplicates across chunks (:mod:`.duplicates`). Read ``CHUNK`` and ``SERIAL_BELOW`` through this
module (``parallel.CHUNK``) so a test can change them in one place.
"""

#: Images per worker task: large enough to hide process overhead, small for a smooth bar.
CHUNK = 64
#: Below this many images the work runs in-process (worker start-up would dominate).
SERIAL_BELOW = 2 * CHUNK
