"""Attention-free sequence layers: linear attention and Mamba.

Modules are imported lazily so that a missing optional piece never breaks
`import keras_lopt.layers`.
"""

from keras_lopt.layers import scan
