"""`unifer serve --model DIR`: the web page for analysing faces and its small ASGI app.

command.py (the CLI) -> app.py (Starlette routes, limits, headers) -> uploads.py (bytes ->
pixels, capped, in memory) -> analysis.py (faces -> the API's answer, with `unifer
predict`'s two back ends) and tracking.py (webcam streams); static/ holds the page;
clip.py makes a synthetic webcam clip for tests and benchmarks.
"""
