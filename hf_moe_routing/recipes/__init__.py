"""Recipes: whole procedures built from the library (the demo, fitting a routing and saving it, plots).

Recipes sit above the library (core -> families -> methods -> patching -> data / evaluation / hub /
training -> integrations) and below the command line, which calls them.
"""
