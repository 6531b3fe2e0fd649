"""Process monitoring: full in-situ probe frames -> particles -> PG fraction over time -> alarm.

- :mod:`.frames`: ``synth-process``, a generated batch run (frames + ground truth);
- :mod:`.detect`: find the particles in a frame and cut crops the classifier understands;
- :mod:`.timeline`: per-frame counts, PG fraction with a Wilson interval, EWMA and the alarm;
- :mod:`.overlay`: frames with boxes coloured by class (what a chemist looks at);
- :mod:`.sinks`: where each scored frame goes (the output files, a progress line, ...);
- :mod:`.opcua`: the OPC UA sink, the run served to a DCS or historian (``--opcua``);
- :mod:`.run`: the ``monitor`` command (one pass over a folder, or ``--watch``).

Nothing here imports torch: with an ``.onnx`` model the whole path runs on ONNX Runtime.
"""
