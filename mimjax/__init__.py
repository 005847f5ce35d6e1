"""mimjax: masked-image-modeling SSL in JAX."""
