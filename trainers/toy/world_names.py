"""The toy world's vocabulary without importing numpy or PIL (node menus need it at ComfyUI start-up)."""
COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star", "cross")
GEOMETRIES = ("narrow", "broad")
#: combo entry of the toy dataset node for "a different base colour / shape in every picture"
ANY = "any (base)"
