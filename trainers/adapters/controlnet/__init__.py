"""ControlNet: the value on the canvas, its files, and applying it while sampling."""
