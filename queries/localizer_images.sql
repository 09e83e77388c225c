-- A multi-valued attribute: every image whose ImageType has LOCALIZER among
-- its values. (JSON_VALUE_ARRAY is NULL for a single value, which is a
-- scalar in metadata; the typed ImageType column is always an array.)
SELECT entity_id, study_instance_uid, sop_instance_uid
FROM `my-research-project.IRB41449.dicom_current`
WHERE 'LOCALIZER' IN UNNEST(JSON_VALUE_ARRAY(metadata, '$.ImageType'))
ORDER BY sop_instance_uid
