"""Sample data and phantoms: :mod:`drrfarm.samples.downloads` fetches and caches the sample chest CT
(``sample:chest_ct``); :mod:`drrfarm.samples.phantoms` builds closed-form phantoms as volumes."""
