"""covid_flax: COVID-19 detection in chest X-ray and CT images with JAX/Flax."""
