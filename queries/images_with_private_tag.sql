-- A private tag, keyed by its tag (no keyword): (0009,1001), which the
-- sample's private creator "DICOMSTORE SAMPLE" (0009,0010) uses for a
-- protocol name. A key starting with a digit is quoted in JSONPath.
SELECT entity_id, sop_instance_uid,
       JSON_VALUE(metadata, '$."00090010"') AS private_creator
FROM `my-research-project.IRB41449.dicom_current`
WHERE JSON_VALUE(metadata, '$."00091001"') = @protocol
ORDER BY sop_instance_uid
