-- Every image whose nested RequestedProcedureCodeSequence (0032,1064) has a
-- given code value (0008,0100); metadata is the DICOM JSON model, by tag.
SELECT entity_id, sop_instance_uid, storage.uri AS uri
FROM `my-research-project.IRB41449.dicom_current`
WHERE JSON_EXTRACT_SCALAR(metadata, "$['00321064'].Value[0]['00080100'].Value[0]") = @code
ORDER BY sop_instance_uid
