"""Looking inside one forward pass: where the last prompt token's attention goes over the image (``lostattn show``).

Used by the command line only; it runs a model, so it sits above ``reporting/`` (which reads finished runs).
"""
