"""Data (numpy + OpenCV): synthetic street scenes, the scene-QA generator, dataset readers.

Imports runtime only (label sets); used by tools (training) and ros (demo camera).
"""
