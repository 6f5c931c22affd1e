"""Low-level helpers every layer imports downward: torchrun and rank helpers, the checkpoint file
format (atomic writes, validated reads; rebuilding a model from one is rebuild.py's, a layer
above), the scripts' life cycle, input checks, image conversions. Nothing here imports another
package of the repo."""
