-- The study objects of every CT study in the collection, one row per object.
SELECT DISTINCT entity_id, study_instance_uid, StudyDate, storage.uri AS uri,
       storage.download_link AS download_link
FROM `my-research-project.IRB41449.dicom_current`
WHERE Modality = 'CT'
ORDER BY entity_id, uri
