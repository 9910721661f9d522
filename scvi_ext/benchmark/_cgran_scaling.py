"""CGRAN (issue 13): genes study, grouped vs dense local attention, time and memory."""
